#!/bin/bash
# A/B of two checkouts, each with its .venv: OLD=<before keep_heap_memory> NEW=<after> bash heap_ab.sh
# (default config; the dense cache in EDROP_RAY_CACHE must already hold its baseline). Output: heap_ab.md
export RAY_AUTH_MODE=disabled EDROP_RAY_CACHE=${EDROP_RAY_CACHE:?a warm dense cache}
for i in 1 2; do
  for b in local ray; do
    for v in old new; do
      if [ $v = old ]; then R=${OLD:?checkout before}; else R=${NEW:?checkout after}; fi
      out=/tmp/hab/$b.$v.$i; rm -rf $out
      (cd $R && PYTHONPATH=$R /usr/bin/time -f "$b $v $i wall %e minflt %R" .venv/bin/python -m edrop_ray prune --quiet --out $out --backend $b 2>&1 | grep -v INFO)
    done
  done
done
