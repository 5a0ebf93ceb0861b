export RAY_AUTH_MODE=disabled EDROP_RAY_CACHE=/tmp/exp/cache
for i in 3 4 5; do
  for v in new old; do
    if [ $v = old ]; then R=/tmp/abold; else R=/tmp/abnew; fi
    out=/tmp/hab/ray.$v.$i; rm -rf $out
    (cd $R && PYTHONPATH=$R /usr/bin/time -f "ray $v $i wall %e" .venv/bin/python -m edrop_ray prune --quiet --out $out --backend ray 2>&1 | grep -v INFO)
  done
done
