#!/bin/busybox sh
# memfabric lab guest /init: boots busybox, fills a tmpfs per the workload profile given on
# the kernel command line (memfabric.KEY=VALUE), prints a ready marker, then idles or churns.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null

profile=static shared_mb=64 random_mb=16 own_mb=0 churn_mb=32 churn_secs=2 seed=0
load_after=0 load_mb=0 load_seed=0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    memfabric.profile=*) profile=${arg#*=} ;;
    memfabric.shared_mb=*) shared_mb=${arg#*=} ;;
    memfabric.random_mb=*) random_mb=${arg#*=} ;;
    memfabric.own_mb=*) own_mb=${arg#*=} ;;
    memfabric.churn_mb=*) churn_mb=${arg#*=} ;;
    memfabric.churn_secs=*) churn_secs=${arg#*=} ;;
    memfabric.seed=*) seed=${arg#*=} ;;
    memfabric.load_after=*) load_after=${arg#*=} ;;
    memfabric.load_mb=*) load_mb=${arg#*=} ;;
    memfabric.load_seed=*) load_seed=${arg#*=} ;;
  esac
done
echo "memfabric-lab: booted $(uname -r) profile=$profile seed=$seed"

mount -t tmpfs -o size=$((shared_mb + random_mb + own_mb + churn_mb + load_mb + 4))m tmpfs /data
# The same bytes in every guest: what KSM should merge across guests.
yes memfabric-shared-block | head -c ${shared_mb}m > /data/shared
# This guest's own block: duplicated inside the guest, unlike any other guest's.
[ "$own_mb" -gt 0 ] && yes "memfabric-guest-$seed" | head -c ${own_mb}m > /data/own
# Unique pages: nothing to merge.
[ "$random_mb" -gt 0 ] && head -c ${random_mb}m /dev/urandom > /data/random

if [ "$profile" = churn ]; then
  # Two 1 MiB patterns; the churn region is rewritten in place with one, then the other,
  # so pages KSM merged in between are written again (host COW breaks).
  yes memfabric-churn-a | head -c 1m > /data/pat0
  yes memfabric-churn-b | head -c 1m > /data/pat1
  j=0
  while [ $j -lt $churn_mb ]; do
    dd if=/data/pat0 of=/data/churn bs=1M seek=$j count=1 conv=notrunc 2>/dev/null
    j=$((j + 1))
  done
fi
echo "memfabric-lab: ready"

if [ "$load_mb" -gt 0 ]; then
  # Later in life the guest loads a block that duplicates another guest's own block.
  (
    sleep "$load_after"
    yes "memfabric-guest-$load_seed" | head -c ${load_mb}m > /data/loaded
    echo "memfabric-lab: loaded ${load_mb} MiB like guest $load_seed"
  ) &
fi

if [ "$profile" = churn ]; then
  i=1
  while true; do
    sleep "$churn_secs"
    src=/data/pat$((i % 2))
    j=0
    while [ $j -lt $churn_mb ]; do
      dd if=$src of=/data/churn bs=1M seek=$j count=1 conv=notrunc 2>/dev/null
      j=$((j + 1))
    done
    i=$((i + 1))
  done
fi
while true; do sleep 3600; done
