"""The local lab: simulated Raspberry Pis on this machine, and the faults tests inflict on them.

    lab/driver.py   the nodes (namespaces, bridge, cgroups, sshd/dockerd/glusterd per node),
                    `Lab`, `instance_lab`; node-init.sh and lab-service.sh run inside the nodes
    lab/tasks.py    the doit tasks lab-up, lab-down, lab-kill, lab-cut, lab-heal, lab-boot,
                    lab-status (dodo.py imports them)
    lab/faults.py   the drill's faults on the lab (kill, cut, docker) and a view into a node
                    that needs no SSH
    lab/images/     the lab's own Home Assistant and Mosquitto images

Test infrastructure, not haswarm itself: nothing in tasks/ imports this package
(tests/unit/test_layout.py checks it). dodo.py, the tests and the benchmarks do.
"""
