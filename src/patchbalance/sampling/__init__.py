"""The sampling rules every command shares: the method registry, the scores, `class_target` and
the sampling figures (SPEC §3.7, §3.8, §5).

Nothing here reads a configuration: a method receives its own validated parameters, and the
figures receive weights and pixel counts. The commands (`build-balanced-dataset`,
`select-coreset`, `report`, `train`, `compare`) import from here, never from each other.
"""
