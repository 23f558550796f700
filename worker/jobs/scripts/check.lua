-- check.lua: record a status check that changed nothing about the job (same status, same
-- queue position): compare-and-set the hand-off and the check marks, count the call, move
-- the due index. The record JSON is neither read nor rewritten; no event is published.
--
-- KEYS[1]  job hash            rcw:job:<id>
-- KEYS[2]  due index zset      rcw:due
-- ARGV[1]  expected version    the job's `version` field as the caller read it
-- ARGV[2]  job id              the member of the due index
-- ARGV[3]  due in              seconds from now until progress is overdue; "" keeps the
--                              current due time; "-" removes the job from the due index
-- ARGV[4]  deadline seconds    "" or seconds after the job's birth (hash field created_ts)
--                              by which the due time is capped (the job deadline)
-- ARGV[5…] field, value, …     bookkeeping fields to set (version + 1, seq, outbox, marks)
--
-- Returns 1 when written, 0 when the stored version differs (the caller read a stale job).
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('HINCRBY', KEYS[1], 'calls', 1)
if ARGV[3] == '-' then
  redis.call('ZREM', KEYS[2], ARGV[2])
elseif ARGV[3] ~= '' then
  local t = redis.call('TIME')
  local due = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[3])
  if ARGV[4] ~= '' then
    local born = tonumber(redis.call('HGET', KEYS[1], 'created_ts') or '')
    if born then due = math.min(due, born + tonumber(ARGV[4])) end
  end
  redis.call('ZADD', KEYS[2], due, ARGV[2])
end
return 1
