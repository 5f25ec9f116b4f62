//! The API on a real kube-apiserver: the CRDs are accepted, the examples are accepted, and every
//! bad manifest is rejected with its rule's message.

mod support;

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use support::control_plane::ControlPlane;

#[tokio::test]
async fn crds_are_established() {
    let plane = ControlPlane::start().await.expect("control plane");
    let client = plane.client().await.expect("client");
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    for crd in discus::api::all_crds() {
        let name = crd.metadata.name.clone().expect("name");
        crds.patch(
            &name,
            &PatchParams::apply("discus-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("{name} rejected: {e}"));
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("established in time")
        .expect("watch");
    }
}
