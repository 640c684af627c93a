"""The local lab: simulated Raspberry Pis on this machine, and the faults tests inflict on them.

    lab/driver.py   `Lab` (up, down, boot, status) put together from the parts below, and
                    `instance_lab`; node-init.sh and lab-service.sh run inside the nodes
    lab/base.py     a lab's names (bridge, netns, veth, cgroups), state directory, host check, lock
    lab/nodes.py    the Pi simulation: a node's netns, cgroups, start, kill, cut, heal, cleanup
    lab/network.py  host networking: the bridge, the FORWARD rule, a lab dockerd's iptables undone
    lab/access.py   SSH keys, ssh config and known_hosts; exec, ssh, wait_ready
    lab/engine.py   the controller's Docker engine (ensure_controller_engine, stop)
    lab/proc.py     small process helpers (run a command, start times, reaping) and LabError
    lab/tasks.py    the doit tasks lab-up, lab-down, lab-kill, lab-cut, lab-heal, lab-boot,
                    lab-status (dodo.py imports them)
    lab/faults.py   the drill's faults on the lab (kill, cut, docker) and a view into a node
                    that needs no SSH
    lab/images/     the lab's own Home Assistant and Mosquitto images

Test infrastructure, not haswarm itself: nothing in tasks/ imports this package
(tests/unit/test_layout.py checks it). dodo.py, the tests and the benchmarks do.
"""
