#!/usr/bin/env bash
# Cluster processes over loopback: etcd started here, xllm engine instances, xllm service front
# doors: outputs equal xllm run for every policy, kill -9 failover, master takeover, role switch
# (cluster/test_cluster.py).
here=$(cd "$(dirname "$0")" && pwd)
exec timeout 300 python3 "$here/cluster/test_cluster.py"
