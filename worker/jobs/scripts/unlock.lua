-- unlock.lua: end a pass that held its lock (worker.jobs.reconcile.redis_lock): keep the lock
-- only for what is left of the period, so the next pass starts neither before the period is
-- over nor while this one was still running. A wake pass also renews its short hold with it
-- between jobs (ARGV[2] = the hold), so a holder killed mid-pass blocks others only that long.
--
-- KEYS[1]  lock key            rcw:reconcile:lock or rcw:wake:lock
-- ARGV[1]  owner               the value the pass set when it took the lock
-- ARGV[2]  milliseconds left   of the period; <= 0: release at once
--
-- Returns 1 when the lock was ours (shortened or released), 0 when someone else holds it.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) <= 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
