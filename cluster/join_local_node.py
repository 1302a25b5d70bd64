"""`ray start` for an extra worker node on this machine, on 127.0.0.1 (run by local_cluster.sh).

Ray's CLI treats RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 as "one machine": addresses stay on loopback,
but `ray start --address` refuses to add a node. Setting the variable to 1 lifts the refusal and
also rewrites 127.0.0.1 to this machine's external address, which must never be used here
(DESIGN §5). So this wrapper keeps the environment at 0 (every process of the node inherits the
loopback behaviour) and lifts only the refusal, inside this one CLI process, without the rewrite.

    python cluster/join_local_node.py --address 127.0.0.1:6379 --node-ip-address 127.0.0.1 [ray start flags]
"""
import sys

import ray._private.ray_constants as ray_constants
import ray._private.services as services
from ray.scripts.scripts import main

if __name__ == "__main__":
    if "--node-ip-address" not in sys.argv:
        sys.exit("join_local_node.py: pass --node-ip-address 127.0.0.1")
    ray_constants.ENABLE_RAY_CLUSTER = True  # the `ray start --address` refusal reads this flag
    services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 as given
    sys.argv = ["ray", "start", *sys.argv[1:]]
    sys.exit(main())
