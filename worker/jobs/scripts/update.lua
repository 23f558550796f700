-- update.lua: compare-and-set write of one job hash, keeping the in-flight set and the due
-- index in step with it. Times come from Redis TIME, never from a worker's clock.
--
-- KEYS[1]  job hash            rcw:job:<id>
-- KEYS[2]  in-flight zset      rcw:inflight
-- KEYS[3]  events channel      rcw:events:<id>
-- KEYS[4]  due index zset      rcw:due
-- ARGV[1]  expected version    the job's `version` field as the caller read it
-- ARGV[2]  ttl seconds         > 0: EXPIRE the hash (final jobs); 0: leave it without one
-- ARGV[3]  final               "1": the job is final, remove it from the in-flight zset
-- ARGV[4]  job id              the member of both zsets
-- ARGV[5]  event               published on KEYS[3] (the new status)
-- ARGV[6]  due in              seconds from now until progress is overdue; "" keeps the
--                              current due time; "-" removes the job from the due index
-- ARGV[7]  deadline seconds    "" or seconds after the job's birth (hash field created_ts)
--                              by which the due time is capped (the job deadline)
-- ARGV[8…] field, value, …     hash fields to set
--
-- Returns 1 when written, 0 when the stored version differs (the caller read a stale job).
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
if ARGV[2] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if ARGV[3] == '1' then redis.call('ZREM', KEYS[2], ARGV[4]) end
if ARGV[6] == '-' then
  redis.call('ZREM', KEYS[4], ARGV[4])
elseif ARGV[6] ~= '' then
  local t = redis.call('TIME')
  local due = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[6])
  if ARGV[7] ~= '' then
    local born = tonumber(redis.call('HGET', KEYS[1], 'created_ts') or '')
    if born then due = math.min(due, born + tonumber(ARGV[7])) end
  end
  redis.call('ZADD', KEYS[4], due, ARGV[4])
end
redis.call('PUBLISH', KEYS[3], ARGV[5])
return 1
