"""The runtime's version (the `stepscore` distribution). `stepscore` is a namespace package shared with the
export project (`stepscore-export`), so the version lives here rather than in a package `__init__`."""

__version__ = "0.1.0"
