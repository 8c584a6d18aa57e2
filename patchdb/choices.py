"""The values some options take, kept where the CLI can read them cheaply. The modules that use
them (report bands and plots, the label plan) sit in packages whose first import loads the store
and numpy; defined there, showing `report --help` or `label --help` loaded them too."""

CI_METHODS = ("words", "samples")  # how a rate band is made: patchdb.report.bands
DEFAULT_CI_METHOD = "words"
FORMATS = ("png", "svg", "pdf")  # plot file formats: patchdb.report.plots
LABEL_PLANS = ("balanced", "widest")  # what `label` offers next: patchdb.label.widest
DEFAULT_LABEL_TARGET = 100  # labels per grader question: patchdb.label.plan
