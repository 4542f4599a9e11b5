//! Engine groups (Avi's service-engine groups): which engines a virtual service may be placed on,
//! and the settings of their auto-rebalance loop, including the scale-in timeout. Every engine
//! and every virtual service is in exactly one group; the `default` group always exists. An
//! engine names its group when it registers; a virtual service when it is created (fixed after).

use std::time::Duration;

use super::{Cluster, ClusterError, check_name, check_version, invalid, obj};
use crate::{
    rebalance::{RebalanceSettings, Rebalancer},
    store::{DEFAULT_GROUP, GroupRecord, Write},
};

/// A group as the API shows it: its record, and who is in it.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupView {
    pub record: GroupRecord,
    pub engines: Vec<String>,
    pub virtual_services: Vec<String>,
}

impl Cluster {
    /// The settings of `group`; of the default group for one that does not exist (never the case
    /// for a stored engine or service).
    pub fn group_settings(&self, group: &str) -> RebalanceSettings {
        self.p
            .groups
            .get(group)
            .or_else(|| self.p.groups.get(DEFAULT_GROUP))
            .map_or(self.settings.default_group, |g| g.settings)
    }

    /// How long an engine leaving virtual service `vs` lets its connections finish: its group's
    /// `vs_scalein_timeout` (the default group's once the service is deleted).
    pub fn scalein_timeout(&self, vs: &str) -> Duration {
        let group = self
            .p
            .services
            .get(vs)
            .map_or(DEFAULT_GROUP, |v| v.spec.engine_group.as_str());
        self.group_settings(group).scalein_timeout
    }

    pub fn group(&self, name: &str) -> Result<GroupView, ClusterError> {
        let record = self
            .p
            .groups
            .get(name)
            .cloned()
            .ok_or_else(|| ClusterError::NotFound(format!("engine group {name:?}")))?;
        Ok(GroupView {
            engines: self
                .p
                .engines
                .values()
                .filter(|e| e.group == name)
                .map(|e| e.name.clone())
                .collect(),
            virtual_services: self
                .p
                .services
                .values()
                .filter(|v| v.spec.engine_group == name)
                .map(|v| v.spec.name.clone())
                .collect(),
            record,
        })
    }

    pub fn groups(&self) -> Vec<GroupView> {
        self.p
            .groups
            .keys()
            .filter_map(|n| self.group(n).ok())
            .collect()
    }

    fn check_group_settings(settings: &RebalanceSettings) -> Result<(), ClusterError> {
        settings.validate().map_err(|e| match e.split_once(": ") {
            Some((field, reason)) => invalid(field, reason),
            None => invalid("settings", e),
        })?;
        Ok(())
    }

    pub fn create_group(
        &mut self,
        name: &str,
        settings: RebalanceSettings,
    ) -> Result<GroupView, ClusterError> {
        check_name("name", name)?;
        if self.p.groups.contains_key(name) {
            return Err(ClusterError::AlreadyExists(format!(
                "engine group {name:?} exists"
            )));
        }
        Self::check_group_settings(&settings)?;
        let rec = GroupRecord {
            name: name.to_owned(),
            settings,
            resource_version: 1,
        };
        self.commit(vec![Write::Group(rec)])?;
        self.rebalancers
            .insert(name.to_owned(), Rebalancer::new(settings));
        self.events
            .emit("placement", &[obj("group", name)], "engine group created");
        self.group(name)
    }

    /// New settings for `name`, made against `resource_version`. The loop keeps its samples; a
    /// changed interval starts a new one. A changed scale-in timeout applies to drains that begin
    /// after it.
    pub fn update_group(
        &mut self,
        name: &str,
        settings: RebalanceSettings,
        resource_version: u64,
    ) -> Result<GroupView, ClusterError> {
        let old = self.group(name)?.record;
        check_version("engine group", name, old.resource_version, resource_version)?;
        Self::check_group_settings(&settings)?;
        if settings == old.settings {
            return self.group(name);
        }
        let rec = GroupRecord {
            settings,
            resource_version: old.resource_version + 1,
            ..old
        };
        self.commit(vec![Write::Group(rec)])?;
        self.rebalancers
            .entry(name.to_owned())
            .or_insert_with(|| Rebalancer::new(settings))
            .set_settings(settings);
        self.events.emit(
            "placement",
            &[obj("group", name)],
            format!(
                "engine group settings: auto_rebalance {}{}, every {} s over the last {} s, {} {}–{}, max_scaleout_per_vs {}, vs_scalein_timeout {} s",
                if settings.enabled { "on" } else { "off" },
                if settings.dry_run { " (dry run)" } else { "" },
                settings.interval.as_secs(),
                settings.window.as_secs(),
                settings.criterion.name(),
                settings.min,
                settings.max,
                settings.max_scaleout_per_vs,
                settings.scalein_timeout.as_secs()
            ),
        );
        self.refresh()?;
        self.group(name)
    }

    /// Deletes an empty group other than `default`.
    pub fn delete_group(&mut self, name: &str) -> Result<(), ClusterError> {
        let view = self.group(name)?;
        if name == DEFAULT_GROUP {
            return Err(ClusterError::FailedPrecondition(
                "the default engine group cannot be deleted".into(),
            ));
        }
        if !view.engines.is_empty() || !view.virtual_services.is_empty() {
            return Err(ClusterError::FailedPrecondition(format!(
                "engine group {name:?} is in use by engines [{}] and virtual services [{}]",
                view.engines.join(", "),
                view.virtual_services.join(", ")
            )));
        }
        self.commit(vec![Write::DeleteGroup(name.to_owned())])?;
        self.rebalancers.remove(name);
        self.events
            .emit("placement", &[obj("group", name)], "engine group deleted");
        Ok(())
    }
}
