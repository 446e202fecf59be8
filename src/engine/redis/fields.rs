//! Reads the keys of a `redis` polling source: one pipeline of read commands, each reply turned into JSON
//! (numbers as numbers, missing as null, hashes as objects).

use deadpool_redis::redis;
use serde_json::{Value, json};

use super::store::RedisStore;

/// Runs each `(command, key)` in one pipeline and returns the replies as JSON, in the order asked. In cluster
/// mode the keys may live on different shards, and a pipeline must stay in one slot: each command goes on its
/// own, all in flight at once.
pub async fn read(store: &RedisStore, commands: &[(String, String)]) -> Result<Vec<Value>, String> {
    if store.keys().is_cluster() {
        let each = commands.iter().map(|(command, key)| {
            let mut cmd = redis::cmd(command);
            cmd.arg(key);
            store.with_conn(|mut c| async move { cmd.query_async::<redis::Value>(&mut c).await })
        });
        let values = futures_util::future::try_join_all(each)
            .await
            .map_err(|e| e.0)?;
        return Ok(values.into_iter().map(redis_to_json).collect());
    }
    let mut pipe = redis::pipe();
    for (command, key) in commands {
        pipe.cmd(command).arg(key);
    }
    let values: Vec<redis::Value> = store
        .with_conn(|mut c| async move { pipe.query_async(&mut c).await })
        .await
        .map_err(|e| e.0)?;
    Ok(values.into_iter().map(redis_to_json).collect())
}

fn redis_to_json(value: redis::Value) -> Value {
    use redis::Value as R;
    let text = |bytes: &[u8]| {
        let s = String::from_utf8_lossy(bytes).into_owned();
        match s.parse::<i64>() {
            Ok(n) => json!(n),
            Err(_) => match s.parse::<f64>() {
                Ok(f) if f.is_finite() => json!(f),
                _ => json!(s),
            },
        }
    };
    match value {
        R::Nil => Value::Null,
        R::Int(n) => json!(n),
        R::BulkString(bytes) => text(&bytes),
        R::SimpleString(s) => text(s.as_bytes()),
        R::Okay => json!("OK"),
        R::Double(f) => json!(f),
        R::Boolean(b) => json!(b),
        R::Map(pairs) => Value::Object(
            pairs
                .into_iter()
                .map(|(k, v)| (redis_key_text(k), redis_to_json(v)))
                .collect(),
        ),
        // HGETALL over RESP2 answers a flat array of field, value, field, value.
        R::Array(items) => {
            let mut object = serde_json::Map::new();
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                object.insert(redis_key_text(k), redis_to_json(v));
            }
            Value::Object(object)
        }
        _ => Value::Null,
    }
}

fn redis_key_text(value: redis::Value) -> String {
    match value {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::SimpleString(s) => s,
        other => format!("{other:?}"),
    }
}
