"""Wait until a local Ray cluster's head node accepts job submissions.

`ray start` returns before the head node's dashboard agent has registered; until it has, `ray job
submit` fails with "No available agent to submit job" (the dashboard waits only 10 s for one, which a
loaded machine can exceed). local_cluster.sh start calls this so that it returns a cluster ready for jobs.

    python cluster/wait_job_agent.py --address 127.0.0.1:6379 [--timeout 180]
"""
from __future__ import annotations

import argparse
import sys
import time


def job_agent_registered(address: str) -> bool:
    """Whether the head node of the cluster at `address` (GCS 'ip:port') has a registered dashboard agent."""
    from ray._private import ray_constants
    from ray._raylet import GcsClient
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX

    gcs = GcsClient(address=address)
    head = gcs.internal_kv_get(ray_constants.KV_HEAD_NODE_ID_KEY, namespace=ray_constants.KV_NAMESPACE_JOB)
    if not head:
        return False
    agent = gcs.internal_kv_get(f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{head.decode()}".encode(),
                                namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    return bool(agent)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the cluster's GCS address, ip:port")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait (default 180)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            if job_agent_registered(args.address):
                return 0
        except Exception:  # the GCS may still be starting  # noqa: BLE001
            pass
        time.sleep(1.0)
    print(f"wait_job_agent: the head node of {args.address} registered no dashboard agent within "
          f"{args.timeout:.0f} s; job submissions will fail (see dashboard_agent.log under the cluster's "
          f"temp dir)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
