-- Counts a channel's live members; ARGV[1] is the pub/sub channel the expired ones' leaves go to ('' for
-- none). Returns {connections, distinct users}.
prune(ARGV[1])
return {redis.call('HLEN', KEYS[1]), redis.call('HLEN', KEYS[3])}
