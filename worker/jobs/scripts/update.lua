-- update.lua: compare-and-set write of one job hash.
--
-- KEYS[1]  job hash            rcw:job:<id>
-- KEYS[2]  in-flight zset      rcw:inflight
-- KEYS[3]  events channel      rcw:events:<id>
-- ARGV[1]  expected version    the job's `version` field as the caller read it
-- ARGV[2]  ttl seconds         > 0: EXPIRE the hash (final jobs); 0: leave it without one
-- ARGV[3]  final               "1": the job is final, remove it from the in-flight zset
-- ARGV[4]  job id              the in-flight zset member
-- ARGV[5]  event               published on KEYS[3] (the new status)
-- ARGV[6…] field, value, …     hash fields to set
--
-- Returns 1 when written, 0 when the stored version differs (the caller read a stale job).
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
if ARGV[2] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if ARGV[3] == '1' then redis.call('ZREM', KEYS[2], ARGV[4]) end
redis.call('PUBLISH', KEYS[3], ARGV[5])
return 1
