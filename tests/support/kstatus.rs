//! The status a GitOps tool computes for a custom resource: a port of the generic rules of
//! kstatus (sigs.k8s.io/cli-utils/pkg/kstatus/status), which Flux's health checks use and Argo
//! CD's discus health check (README) follows.
//!
//! In order: an object being deleted is Terminating; an object whose `status.observedGeneration`
//! differs from `metadata.generation` is InProgress; a `Reconciling` condition that is True makes
//! it InProgress, a `Stalled` one Failed; anything else is Current.

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kstatus {
    InProgress,
    Failed,
    Current,
    Terminating,
}

pub fn compute(object: &Value) -> Kstatus {
    if object.pointer("/metadata/deletionTimestamp").is_some() {
        return Kstatus::Terminating;
    }
    let generation = object
        .pointer("/metadata/generation")
        .and_then(Value::as_i64);
    let observed = object
        .pointer("/status/observedGeneration")
        .and_then(Value::as_i64);
    if let (Some(generation), Some(observed)) = (generation, observed)
        && generation != observed
    {
        return Kstatus::InProgress;
    }
    let condition = |kind: &str| {
        object
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| c["type"] == kind && c["status"] == "True")
    };
    if condition("Reconciling") {
        Kstatus::InProgress
    } else if condition("Stalled") {
        Kstatus::Failed
    } else {
        Kstatus::Current
    }
}
