-- Records a polling job unless the fleet already stores the most it may (`poller.max_jobs`): the count and the
-- insert happen in one step, so replicas starting jobs at the same moment cannot pass the limit together.
-- KEYS[1] the jobs hash; ARGV[1] job id, ARGV[2] job spec (JSON), ARGV[3] the limit.
-- Returns 1 when recorded, 0 when the job exists already (left unchanged), -1 when the limit is reached.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return 0
end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
