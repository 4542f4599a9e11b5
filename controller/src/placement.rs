//! Where a virtual service runs: engines carrying the tags it asks for, then the least utilised
//! (CPU, then number of virtual services), ties by name, so the choice is deterministic. The first
//! engine chosen is the primary. Pure: the caller passes what it knows of every engine.

use std::collections::BTreeMap;

/// What placement knows of one engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub tags: BTreeMap<String, String>,
    /// Failed or flapping engines are never chosen; the reason says which.
    pub unavailable: Option<&'static str>,
    pub cpu_pct: f64,
    pub virtual_services: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("needs {needed} engine(s){tagged}, {eligible} eligible{detail}")]
pub struct NotEnough {
    pub needed: usize,
    pub tagged: String,
    pub eligible: usize,
    /// Why the others with the tags were left out, e.g. ": se3 is failed".
    pub detail: String,
}

fn tags_text(tags: &BTreeMap<String, String>) -> String {
    if tags.is_empty() {
        return String::new();
    }
    let t: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(" tagged {}", t.join(","))
}

/// Engines that may take a virtual service asking for `tags`, best first, leaving out `exclude`.
pub fn ranked<'a>(
    candidates: &'a [Candidate],
    tags: &BTreeMap<String, String>,
    exclude: &[String],
) -> Vec<&'a Candidate> {
    let mut ok: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.unavailable.is_none())
        .filter(|c| !exclude.contains(&c.name))
        .filter(|c| tags.iter().all(|(k, v)| c.tags.get(k) == Some(v)))
        .collect();
    ok.sort_by(|a, b| {
        a.cpu_pct
            .total_cmp(&b.cpu_pct)
            .then(a.virtual_services.cmp(&b.virtual_services))
            .then(a.name.cmp(&b.name))
    });
    ok
}

/// `n` engines for a virtual service asking for `tags`, the primary first, or why not.
pub fn choose(
    candidates: &[Candidate],
    tags: &BTreeMap<String, String>,
    n: usize,
    exclude: &[String],
) -> Result<Vec<String>, NotEnough> {
    let ranked = ranked(candidates, tags, exclude);
    if ranked.len() >= n {
        return Ok(ranked.iter().take(n).map(|c| c.name.clone()).collect());
    }
    let left_out: Vec<String> = candidates
        .iter()
        .filter(|c| tags.iter().all(|(k, v)| c.tags.get(k) == Some(v)))
        .filter_map(|c| {
            if exclude.contains(&c.name) {
                Some(format!("{} is already placed", c.name))
            } else {
                c.unavailable.map(|why| format!("{} is {why}", c.name))
            }
        })
        .collect();
    Err(NotEnough {
        needed: n,
        tagged: tags_text(tags),
        eligible: ranked.len(),
        detail: if left_out.is_empty() {
            String::new()
        } else {
            format!(": {}", left_out.join(", "))
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, zone: &str, cpu: f64, vs: usize) -> Candidate {
        Candidate {
            name: name.into(),
            tags: BTreeMap::from([("zone".into(), zone.into())]),
            unavailable: None,
            cpu_pct: cpu,
            virtual_services: vs,
        }
    }

    fn zone(z: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("zone".into(), z.into())])
    }

    #[test]
    fn tags_then_cpu_then_services_then_name() {
        let all = [
            c("se1", "a", 50.0, 0),
            c("se2", "a", 10.0, 3),
            c("se3", "a", 10.0, 1),
            c("se4", "b", 0.0, 0),
            c("se0", "a", 10.0, 1),
        ];
        assert_eq!(
            choose(&all, &zone("a"), 3, &[]).unwrap(),
            ["se0", "se3", "se2"],
            "cpu first, then fewer services, then the name"
        );
        assert_eq!(choose(&all, &BTreeMap::new(), 1, &[]).unwrap(), ["se4"]);
        assert_eq!(
            choose(&all, &zone("a"), 1, &["se0".into()]).unwrap(),
            ["se3"]
        );
    }

    #[test]
    fn not_enough_says_what_is_missing() {
        let mut failed = c("se3", "a", 0.0, 0);
        failed.unavailable = Some("failed");
        let all = [c("se1", "a", 0.0, 0), failed, c("se2", "b", 0.0, 0)];
        let err = choose(&all, &zone("a"), 2, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "needs 2 engine(s) tagged zone=a, 1 eligible: se3 is failed"
        );
        let err = choose(&all, &BTreeMap::new(), 3, &["se1".into()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "needs 3 engine(s), 1 eligible: se1 is already placed, se3 is failed"
        );
    }
}
