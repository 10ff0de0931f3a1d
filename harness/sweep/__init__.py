"""The fault sweep (``tdxh sweep FLOW``): every SEAMCALL site of a flow failed in turn with the
statuses the real module can return there, each run's outcome classified.

plan: call sites and occurrences from an enumeration trace, the runs to make.
statuses: per leaf, the statuses the real module returns (intel/tdx-module), by class.
outcome: a run's outcome from the kernel log, the trace, the module and the machine.
flows: the flows a sweep replays (boot, ...), in the scenarios' style.
declared: the known outcomes (site, status -> class, with the kernel's reason).
runner: enumerate, run, classify, report (sweep.json, sweep.html, bundles).
"""
