"""SpRAy: Spectral Relevance Analysis of explanation heatmaps (Lapuschkin et al., 2019).

`SpRAyDetector` clusters heatmaps (N, H, W) and flags clusters that look like Clever Hans
behaviour: a label-pure minority of a class whose relevance is markedly more concentrated, or
sits somewhere else, than in the rest of that class.

Heatmaps come from anywhere:

- precomputed: `SpRAyDetector().fit(heatmaps=maps, labels=labels)`;
- GradCAM through pytorch-grad-cam (`pip install 'edgeshort[offline]'`):
  `fit(inputs=x, model=model, target_layer="blocks.3.norm1", head=None, targets=None)`, with
  the token-to-grid reshape for ViTs (prefix tokens stripped by count) and conv layers as is;
- any generator callable `(inputs) -> (N, H, W)`: `SpRAyDetector(heatmap_generator=fn)` or
  `fit(inputs=x, heatmap_generator=fn)`.

openvino-xai plugs in through the generator (it is not a dependency: its last release needs
openvino 2024.4 and numpy<2, so keep it in its own environment, save the maps with
`np.save`, and fit on the array, or call it in-process where it is installed)::

    import numpy as np
    import openvino_xai as xai

    explainer = xai.Explainer(model=ov_model, task=xai.Task.CLASSIFICATION, preprocess_fn=preprocess)

    def ov_saliency(images):
        maps = []
        for image in images:
            explanation = explainer(image, targets=-1)  # -1: the predicted class
            maps.append(np.asarray(next(iter(explanation.saliency_map.values())), dtype=np.float32))
        return np.stack(maps)

    SpRAyDetector(heatmap_generator=ov_saliency).fit(inputs=images, labels=labels)

The rest of this package imports lazily, so `import edgeshort.spray` costs nothing until used.
"""

from __future__ import annotations

from edgeshort._lazy import lazy_getattr

_LAZY = {
    "SpRAyDetector": "edgeshort.spray.detector",
    "CleverHansCriteria": "edgeshort.spray.assess",
    "RISK_LEVELS": "edgeshort.spray.choices",
    "GradCAMHeatmaps": "edgeshort.spray.heatmaps",
    "TokenGridReshape": "edgeshort.spray.heatmaps",
    "preserved_model_state": "edgeshort.spray.heatmaps",
    "make_spray_heatmaps": "edgeshort.spray.synthetic",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr("edgeshort.spray", _LAZY)
