//! Pins the Sandboxd/TestEnv fixtures against the real binary: it comes up SERVING on a fresh
//! environment that holds nothing, stops gracefully even while a client channel is open, and
//! restarts on the same port and data dir.

mod common;

use std::time::{Duration, Instant};

use common::TestEnv;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn overall_health(client: &mut HealthClient<tonic::transport::Channel>) -> ServingStatus {
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status()
}

#[tokio::test]
async fn sandboxd_stops_gracefully_with_a_client_open_and_restarts_in_place() {
    let env = TestEnv::new().await;
    env.leak_check().await;
    let mut client = HealthClient::new(env.channel().await);
    assert_eq!(overall_health(&mut client).await, ServingStatus::Serving);

    let (pid, addr, data_dir) = (
        env.sandboxd.pid(),
        env.sandboxd.addr(),
        env.sandboxd.data_dir(),
    );
    let started = Instant::now();
    let status = env.sandboxd.stop().expect("sandboxd was running");
    assert!(status.success(), "SIGTERM exit: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "graceful stop took {:?} with a client open",
        started.elapsed()
    );
    assert!(!env.sandboxd.is_running());

    env.sandboxd.restart().await;
    assert_ne!(env.sandboxd.pid(), pid);
    assert_eq!(env.sandboxd.addr(), addr);
    assert_eq!(env.sandboxd.data_dir(), data_dir);
    // The channel from before the restart reconnects to the same address.
    assert_eq!(overall_health(&mut client).await, ServingStatus::Serving);

    let crashed = env.sandboxd.kill().expect("sandboxd was running");
    assert!(!crashed.success());
    env.sandboxd.restart().await;
    assert_eq!(overall_health(&mut client).await, ServingStatus::Serving);
    env.leak_check().await;
}
