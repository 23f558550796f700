-- create.lua: the birth of a job, only if its hash does not exist yet.
--
-- KEYS[1]  job hash            rcw:job:<id>
-- KEYS[2]  in-flight zset      rcw:inflight
-- KEYS[3]  events channel      rcw:events:<id>
-- ARGV[1]  ttl seconds         > 0: EXPIRE the hash (born final); 0: leave it without one
-- ARGV[2]  in flight           "1": add the job to the in-flight zset
-- ARGV[3]  score               its in-flight score (creation time, epoch seconds)
-- ARGV[4]  job id              the in-flight zset member
-- ARGV[5]  event               published on KEYS[3] (the status)
-- ARGV[6…] field, value, …     hash fields to set
--
-- Returns 1 when created, 0 when the job already existed (left unchanged).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
if ARGV[1] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
if ARGV[2] == '1' then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4]) end
redis.call('PUBLISH', KEYS[3], ARGV[5])
return 1
