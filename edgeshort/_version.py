__version__ = "0.1.0"


def package_versions(distributions: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions by distribution name (None when absent), from package metadata: importing torch
    or nncf only to read a version is slow."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in distributions:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
