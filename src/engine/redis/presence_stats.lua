-- Counts a channel's live members. Returns {connections, distinct users}.
prune()
return {redis.call('HLEN', KEYS[1]), redis.call('HLEN', KEYS[3])}
