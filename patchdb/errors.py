"""Domain exceptions. The CLI turns each into one `Error: ...` line and exit code 1."""


class PatchdbError(Exception):
    """Base class of every error a user can cause or fix."""


class ConfigError(PatchdbError):
    """A sweep or judge configuration is invalid (unknown key, bad value, bad TOML)."""


class RangeError(ConfigError):
    """A layer range string could not be parsed."""


class UnknownNameError(PatchdbError):
    """A sweep, experiment, word or grader that does not exist was named."""


class StoreError(PatchdbError):
    """The store cannot be opened or used: not SQLite, truncated, locked for too long."""


class StoreNewerError(StoreError):
    """The store's schema was written by a newer patchdb than this one."""


class ModelError(PatchdbError):
    """A model cannot be loaded, or its layers cannot be found."""


class JudgeError(PatchdbError):
    """The judge cannot proceed (bad key, no credit, bad template)."""


class ImportFormatError(PatchdbError):
    """A file of the JSON layout has the wrong shape."""


class LabelError(PatchdbError):
    """A human label cannot be written (unknown rollout, a grader the rollout is not asked)."""


class CalibrationError(PatchdbError):
    """The labels cannot support a calibration or a corrected rate (too few, judge no better
    than chance)."""


class SweepNotEmptyError(PatchdbError):
    """`patchdb sweeps rm` was asked to remove a sweep that holds results or is being run."""


class ReportFolderError(PatchdbError):
    """The report folder holds another store's report of a sweep with the same name."""
