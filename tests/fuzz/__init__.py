"""Fuzzing of every decoder and every request handler (issue 9).

`engine` runs mutation loops under a per-input time guard and keeps one minimal reproducer per distinct
crash; `mutators` knows the frame, record and JSON formats well enough to get mutations past checksums
and seals; `decoders` lists the in-process targets; `sessions` and `fakeps` drive real daemons over real
TLS. The pytest files run a CI-sized budget; `STANDBY_FUZZ_INPUTS` selects a long run (see engine).
"""
