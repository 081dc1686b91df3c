#!/usr/bin/env bash
# Review a policy change in a policy repository: check the proposed policies, then replay every
# recording kept in the repository with the current policies (the base branch) and the proposed
# ones (this branch), and say where they would have acted differently.
#
#   examples/ci/policy-review.sh BASE_POLICIES NEW_POLICIES RECORDINGS_DIR OUT_DIR
#
# Writes OUT_DIR/<recording>.json (replay --against --format json, for a bot to post) and
# OUT_DIR/summary.md (the text side by side, for a pull-request comment). Exits 1 when a policy
# does not pass 'policy check'; a difference in behaviour is not a failure: it is what the review
# is for. Needs no root and no BPF: replay runs the engine on the recorded samples.
#
# Repository layout this expects (adapt the paths):
#   policies/            the policy files the hosts run
#   recordings/*.jsonl   incidents worth keeping ('remediator record', or a daemon's [recording])
#   recordings/request-cpus   optional: the request CPUs of the recorded hosts (default 0)
set -euo pipefail

base=${1:?usage: policy-review.sh BASE_POLICIES NEW_POLICIES RECORDINGS_DIR OUT_DIR}
new=${2:?}
recordings=${3:?}
out=${4:?}
remediator=${REMEDIATOR:-remediator}
mkdir -p "$out"

"$remediator" policy check "$new"

request_cpus=0
[ -f "$recordings/request-cpus" ] && request_cpus=$(cat "$recordings/request-cpus")

{
    echo "## remediator: what this policy change would change"
    echo
} > "$out/summary.md"
changed=0
shopt -s nullglob
for recording in "$recordings"/*.jsonl "$recordings"/*.jsonl.1; do
    name=$(basename "$recording")
    "$remediator" replay "$recording" --policies "$base" --against "$new" --request-cpus "$request_cpus" \
        --format json > "$out/$name.json"
    if ! python3 -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["same"] else 1)' "$out/$name.json"; then
        changed=$((changed + 1))
    fi
    {
        echo "### $name"
        echo '```'
        "$remediator" replay "$recording" --policies "$base" --against "$new" --request-cpus "$request_cpus"
        echo '```'
    } >> "$out/summary.md"
done
echo "$changed recording(s) where the proposed policies act differently" | tee -a "$out/summary.md"
