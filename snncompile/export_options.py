"""The export options' defaults and choices, without torch: `snncompile --help` reads them (cli.py imports
no torch), and exports.py names files and commands by them. One place, so that a default changed here is
the default the help shows, and export's file names and hints (`_n<samples>`, `--samples`) agree with it."""

__all__ = ["DEFAULT_OPSET", "DEFAULT_SAMPLES", "EXPORT_PRECISIONS"]

DEFAULT_OPSET = 18
DEFAULT_SAMPLES = 256  # random and real reference inputs each (`export --samples`)
EXPORT_PRECISIONS = ("fp32", "fp16", "bf16", "tf32x2")
