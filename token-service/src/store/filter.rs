//! The `list_leases` query, built once for both stores.

use super::LeaseFilter;
use super::row::{self, Placeholder, Value};
use crate::clock::to_millis;

/// `SELECT … FROM leases WHERE … ORDER BY created_at DESC, id DESC LIMIT …` for
/// `filter`, numbering its parameters in the store's style, with the values to bind.
pub(crate) fn list_leases(
    filter: &LeaseFilter,
    limit: usize,
    p: Placeholder,
) -> (String, Vec<Value>) {
    let mut sql = format!("SELECT {} FROM leases WHERE 1 = 1", row::lease_columns());
    let mut args: Vec<Value> = Vec::new();
    let mut bind = |value: Value| {
        args.push(value);
        p.at(args.len())
    };
    for (column, value) in [
        ("tenant", &filter.tenant),
        ("subject", &filter.subject),
        ("actor", &filter.actor),
        ("job_id", &filter.job_id),
    ] {
        if let Some(v) = value {
            sql.push_str(&format!(" AND {column} = {}", bind(v.as_str().into())));
        }
    }
    if let Some(active) = filter.active {
        sql.push_str(&format!(" AND active = {}", bind(active.into())));
    }
    if let Some((created, id)) = &filter.after {
        let c = bind(to_millis(*created).into());
        let i = bind(id.as_str().into());
        sql.push_str(&format!(
            " AND (created_at < {c} OR (created_at = {c} AND id < {i}))"
        ));
    }
    let n = bind(row::limit(limit).into());
    sql.push_str(&format!(" ORDER BY created_at DESC, id DESC LIMIT {n}"));
    (sql, args)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn each_set_field_adds_one_condition_numbered_in_the_store_style() {
        let all = LeaseFilter::default();
        let (sql, args) = list_leases(&all, 10, Placeholder::Question);
        assert!(sql.ends_with("WHERE 1 = 1 ORDER BY created_at DESC, id DESC LIMIT ?1"));
        assert_eq!(args, [Value::Int(10)]);

        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(5);
        let some = LeaseFilter {
            tenant: Some("t".into()),
            job_id: Some("j".into()),
            active: Some(true),
            after: Some((at, "id-9".into())),
            ..LeaseFilter::default()
        };
        let (sql, args) = list_leases(&some, 3, Placeholder::Dollar);
        assert!(
            sql.ends_with(
                "WHERE 1 = 1 AND tenant = $1 AND job_id = $2 AND active = $3 AND \
                 (created_at < $4 OR (created_at = $4 AND id < $5)) \
                 ORDER BY created_at DESC, id DESC LIMIT $6"
            ),
            "{sql}"
        );
        assert_eq!(
            args,
            [
                Value::from("t"),
                Value::from("j"),
                Value::Bool(true),
                Value::Int(5),
                Value::from("id-9"),
                Value::Int(3)
            ]
        );
    }
}
