-- learn.lua: add one finished job's run time to its kind's sketch (worker.jobs.runtimes).
--
-- KEYS[1]  current window hash   rcw:runtimes:<kind>:cur
-- KEYS[2]  previous window hash  rcw:runtimes:<kind>:old
-- ARGV[1]  bucket index          of the run time (log-spaced buckets)
-- ARGV[2]  early                 "1": found finished at a check pushed past the 10 % rule
-- ARGV[3]  window                samples per window; a full current window becomes the
--                                previous one (RENAME) and a new one starts
-- ARGV[4]  ttl seconds           both hashes expire this long after the last sample
--
-- Returns the number of samples in the current window after the call (0 when it turned over).
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if ARGV[2] == '1' then redis.call('HINCRBY', KEYS[1], 'early', 1) end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
if n >= tonumber(ARGV[3]) then
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  return 0
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
return n
