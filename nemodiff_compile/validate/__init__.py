"""Step-by-step validation of a compiled backend against the PyTorch reference.

    from nemodiff_compile.validate import validate, TOLERANCES
    report = validate(reference, engine, prompts, tolerances=TOLERANCES["bf16"])
    print(report.to_table()); report.to_json()
"""

from .tolerances import TOLERANCES, Tolerances, tolerances_for

__all__ = ["validate", "ValidationReport", "Tolerances", "TOLERANCES", "tolerances_for"]


def __getattr__(name):                            # torch-heavy parts load on first use
    if name in ("validate", "ValidationReport", "PassStats", "ModeResult"):
        from . import compare
        return getattr(compare, name)
    raise AttributeError(name)
