"""The torch-free edge runtime: numpy, Pillow and ONNX Runtime or OpenVINO only."""
