"""Kernel coverage of the TDX host code (``--coverage DIR``): which objects the coverage variant
of the kernel profiles (``objects``), copying the gcov counters out of a guest before each of
its kernels ends (``collect``), and merging them with gcov + gcovr into a report with
per-scenario attribution and the named blind spots (``report``).

Layout of DIR:
    build.json                  the coverage build the counters belong to (build dir, source tree)
    raw/<scenario>/<machine>/k<N>/...gcda
                                counters of kernel N of that machine (cumulative at its snapshot)
    raw/<scenario>/events.json  snapshots taken and blind spots, per machine
    by-scenario/<scenario>.json gcovr JSON of each scenario
    coverage.json               gcovr JSON of everything (merged)
    coverage-summary.json       gcovr --json-summary (file names relative to the kernel tree)
    coverage.lcov               lcov tracefile
    html/index.html             gcovr's HTML, line and branch coverage of each file
    lines-by-scenario.json      {file: {line: [scenarios that reached it]}}
    blind-spots.json            what the counters cannot show, and why
"""
