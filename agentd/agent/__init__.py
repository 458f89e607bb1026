"""One agent (`agentd serve`), split by job; `wiring.Daemon` is the composition root and owns the lifecycle.

| module | job |
|---|---|
| wiring.py | builds the parts; start in order, stop in reverse (one AsyncExitStack) |
| main.py | `run_daemon`: the event loop, joining with a token first |
| reporter.py | inventory and instance states to the leader |
| reconciler.py | this host's assignments to the supervisor, once caught up |
| models.py | copies of models between hosts (serve, locate, fetch) |
| http.py | the HTTP app's provider (routes, models, readiness, wakes) |
| membership.py | members, joiners, watchers, invitations |
| renewer.py | certificate renewal through the cluster |
| systemd.py | READY/STATUS/WATCHDOG |
| logs.py | instance logs on this host |
| identity.py | the node certificate and the calls bound to it |
"""
