//! The JSON patch the webhook returns: only additions at the places the
//! injection changed, with list items matched by name, so what the pod
//! already has is never rewritten. The API server applies the patch to the
//! pod it holds, including fields this build's typed view does not know
//! (newer Kubernetes versions): they are never named by an operation, so
//! they stay where they are.

use json_patch::{
    AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation, jsonptr::PointerBuf,
};
use serde_json::Value;

/// The operations that turn `before` into `after`. Items of lists of
/// objects are matched by `mountPath` (volume mounts) or `name`
/// (containers, volumes, env): a new item is one `add` at its position,
/// however many items follow it.
pub fn between(before: &Value, after: &Value) -> Patch {
    let mut operations = Vec::new();
    diff(&mut PointerBuf::root(), before, after, &mut operations);
    Patch(operations)
}

fn diff(path: &mut PointerBuf, before: &Value, after: &Value, out: &mut Vec<PatchOperation>) {
    if before == after {
        return;
    }
    match (before, after) {
        (Value::Object(old), Value::Object(new)) => {
            for (key, value) in new {
                path.push_back(key.as_str());
                match old.get(key) {
                    Some(previous) => diff(path, previous, value, out),
                    None => out.push(add(path, value)),
                }
                path.pop_back();
            }
            for key in old.keys().filter(|k| !new.contains_key(*k)) {
                path.push_back(key.as_str());
                out.push(PatchOperation::Remove(RemoveOperation {
                    path: path.clone(),
                }));
                path.pop_back();
            }
        }
        (Value::Array(old), Value::Array(new)) => {
            if !diff_keyed(path, old, new, out) && !append(path, old, new, out) {
                out.push(replace(path, after));
            }
        }
        _ => out.push(replace(path, after)),
    }
}

/// The field list items are matched by, when every item of both lists has
/// it, uniquely.
fn item_key<'a>(old: &'a [Value], new: &'a [Value]) -> Option<&'static str> {
    ["mountPath", "name"].into_iter().find(|field| {
        [old, new].iter().all(|items| {
            let keys: Vec<&str> = items
                .iter()
                .filter_map(|item| item.get(*field).and_then(Value::as_str))
                .collect();
            keys.len() == items.len()
                && keys.iter().collect::<std::collections::BTreeSet<_>>().len() == keys.len()
        })
    })
}

/// Items matched by key: the old ones, in their order, plus new ones added
/// in place. False when the lists do not have that shape.
fn diff_keyed(
    path: &mut PointerBuf,
    old: &[Value],
    new: &[Value],
    out: &mut Vec<PatchOperation>,
) -> bool {
    let Some(field) = item_key(old, new) else {
        return false;
    };
    let key = |item: &Value| item.get(field).and_then(Value::as_str).map(str::to_owned);
    let old_keys: Vec<Option<String>> = old.iter().map(key).collect();
    let kept: Vec<Option<String>> = new
        .iter()
        .map(key)
        .filter(|k| old_keys.contains(k))
        .collect();
    if kept != old_keys {
        return false; // an item was removed or moved: not what injection does
    }
    let mut next_old = 0;
    for (index, item) in new.iter().enumerate() {
        path.push_back(index);
        if old_keys.get(next_old) == Some(&key(item)) {
            diff(path, &old[next_old], item, out);
            next_old += 1;
        } else {
            out.push(add(path, item));
        }
        path.pop_back();
    }
    true
}

/// Items appended to an unchanged list.
fn append(
    path: &mut PointerBuf,
    old: &[Value],
    new: &[Value],
    out: &mut Vec<PatchOperation>,
) -> bool {
    if new.len() < old.len() || new[..old.len()] != *old {
        return false;
    }
    for item in &new[old.len()..] {
        path.push_back("-");
        out.push(add(path, item));
        path.pop_back();
    }
    true
}

fn add(path: &PointerBuf, value: &Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: path.clone(),
        value: value.clone(),
    })
}

fn replace(path: &PointerBuf, value: &Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path: path.clone(),
        value: value.clone(),
    })
}
