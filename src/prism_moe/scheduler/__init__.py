"""The global scheduler: live statistics, re-placement, live expert migration and failure handling.

Policy apart from mechanism (as Petals keeps `block_selection` apart from its server):

* pure, no I/O and no clock of their own: `history` (decayed counts, workload-shift detection),
  `decision` (migrate or not: C(P') + T_mig < C(P) x (1 - margin)), `candidate` (the placement or
  execution plan to move to, the repair placement after a failure), `migration` (the order of loads,
  switches and drops that never exceeds a server's slots);
* mechanism: `client` (HTTP calls to the servers' `/prism/*` routes), `executor` (runs a migration plan,
  ending on an execution plan's route when asked; rolls back on failure), `coordinator` (polls, keeps
  state, decides, serves its HTTP API).
"""
