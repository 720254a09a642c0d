"""The autoguidance sweep: metrics of generated images over main EMA length x guide EMA length x guidance
weight (x guidance rule x guidance interval), resumable cell by cell.

    run       SweepConfig, the cells evaluated (networks held, sampling, metrics) and resumed
    source    where the networks of one axis come from (snapshot folder, fixed file, self guide)
    axes      the rule and interval axes: spec strings of a cell
    plan      the order the cells are visited in; the coordinate search
    log       the output folder's files: cells.jsonl and sweep.json
    report    the plan printed, the table, figures, the best networks and their command lines

The metrics themselves are `edm2.metrics`; the sweep is one of their users.
"""
