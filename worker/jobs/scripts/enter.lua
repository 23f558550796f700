-- enter.lua: put a job in the waiting room (idempotent), behind the jobs of its tenant and
-- priority; its tenant joins that priority's round-robin if it had nobody waiting.
--
-- KEYS[1]  waiting hash        rcw:waiting          job id -> "<priority>|<tenant>"
-- KEYS[2]  tenant queue        rcw:wait:<priority>:<tenant>   (list, FIFO)
-- KEYS[3]  round-robin list    rcw:rr:<priority>    tenants with jobs waiting
-- KEYS[4]  slots zset          rcw:slots            jobs holding a RunComfy slot
-- ARGV[1]  job id
-- ARGV[2]  "<priority>|<tenant>"
-- ARGV[3]  tenant
-- ARGV[4]  "front": go first in its queue (a job handed back after a pause), else last
--
-- Returns 1 when it entered, 0 when it was already waiting, 2 when it holds a slot already.
if redis.call('ZSCORE', KEYS[4], ARGV[1]) then return 2 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
if redis.call('LLEN', KEYS[2]) == 0 then
  redis.call('LREM', KEYS[3], 0, ARGV[3])
  redis.call('RPUSH', KEYS[3], ARGV[3])
end
if ARGV[4] == 'front' then
  redis.call('LPUSH', KEYS[2], ARGV[1])
else
  redis.call('RPUSH', KEYS[2], ARGV[1])
end
return 1
