//! Policies that come from containers and pods: the `kad.dev/keepalive` annotation's grammar,
//! the OCI runtime hook (`kad oci-hook`), pod policies and the Kubernetes watcher, Docker
//! containers' labels and the Docker watcher. Imports
//! [`crate::api`], [`crate::host`] and [`crate::model`]; never the kernel side.
pub mod annotation;
pub mod docker;
pub mod docker_watch;
pub mod kube_watch;
pub mod oci;
pub mod pods;
