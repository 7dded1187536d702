"""`report`: what the weights will do in training (SPEC §5).

`figures` computes the figures from the table, `html` renders the self-contained page, `map`
draws the footprints. `patchbalance.report(table)` is the function of the spec.
"""
