-- create.lua: the birth of a job, only if its hash does not exist yet. Records the birth
-- time (Redis TIME) in the hash as `created_ts`, and enters a job that expects progress in
-- the due index.
--
-- KEYS[1]  job hash            rcw:job:<id>
-- KEYS[2]  in-flight zset      rcw:inflight
-- KEYS[3]  events channel      rcw:events:<id>
-- KEYS[4]  due index zset      rcw:due
-- ARGV[1]  ttl seconds         > 0: EXPIRE the hash (born final); 0: leave it without one
-- ARGV[2]  in flight           "1": add the job to the in-flight zset
-- ARGV[3]  score               its in-flight score (creation time, epoch seconds)
-- ARGV[4]  job id              the member of both zsets
-- ARGV[5]  event               published on KEYS[3] (the status)
-- ARGV[6]  due in              "" (not in the due index) or seconds from now until its first
--                              progress is overdue (a submit message never picked up)
-- ARGV[7…] field, value, …     hash fields to set
--
-- Returns 1 when created, 0 when the job already existed (left unchanged).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], 'created_ts', string.format('%.6f', now), unpack(ARGV, 7))
if ARGV[1] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
if ARGV[2] == '1' then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4]) end
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), ARGV[4]) end
redis.call('PUBLISH', KEYS[3], ARGV[5])
return 1
