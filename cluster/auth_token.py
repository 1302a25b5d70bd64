"""Make sure this user has a Ray auth token and print where it is (run by local_cluster.sh start).

Clusters the project starts use Ray's token authentication; clients (`ray job submit`, `ray status`,
the stages) need RAY_AUTH_MODE=token and the same token. The token is generated on first use into
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, readable by the user only (pipeline.ray_env.ensure_auth_token).

    python cluster/auth_token.py          # prints the token file's path
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.ray_env import ensure_auth_token  # noqa: E402


if __name__ == "__main__":
    path = ensure_auth_token()
    print(path if path is not None else "RAY_AUTH_TOKEN (environment)")
