#!/usr/bin/env bash
# Cluster scheduling over loopback: dynamic PD switches roles as the load shifts (seen in
# /metrics and etcd, no request lost); offline requests fill idle capacity only
# (cluster/test_cluster_sched.py).
here=$(cd "$(dirname "$0")" && pwd)
exec timeout 480 python3 "$here/cluster/test_cluster_sched.py"
