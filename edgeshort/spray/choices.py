"""SpRAy's named choices, in a module with no imports so the CLI can offer them without loading numpy."""

RISK_LEVELS = ("none", "low", "medium", "high")
AFFINITIES = ("cosine", "rbf", "knn")
CLUSTER_SELECTIONS = ("auto", "eigengap", "fixed")


def risk_rank(level: str) -> int:
    return RISK_LEVELS.index(level)
