//! ImageService against a real local registry and containerd.

mod common;

use common::TestEnv;
use futures::StreamExt;
use sandboxd::pb;
use sandboxd::pb::image_service_client::ImageServiceClient;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn pull_streams_progress_and_ends_with_the_image() {
    let env = TestEnv::new().await;
    let mut c = ImageServiceClient::new(env.channel().await);
    let mut stream = c
        .pull_image(pb::PullImageRequest {
            image: env.image_ref(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut messages = Vec::new();
    while let Some(msg) = stream.next().await {
        messages.push(msg.expect("pull stream"));
    }
    let statuses: Vec<&str> = messages.iter().map(|m| m.status.as_str()).collect();
    assert!(statuses.contains(&"resolving"), "{statuses:?}");
    assert!(
        statuses
            .iter()
            .any(|s| *s == "downloading" || *s == "downloaded"),
        "{statuses:?}"
    );
    assert!(statuses.contains(&"unpacking"), "{statuses:?}");
    let last = messages.last().unwrap();
    let image = last
        .image
        .clone()
        .expect("the last message carries the image");
    assert_eq!(image.name, env.image_ref());
    assert!(image.digest.starts_with("sha256:"));
    assert!(
        image.size_bytes > 100_000,
        "busybox is bigger than {}",
        image.size_bytes
    );
    assert!(messages[..messages.len() - 1]
        .iter()
        .all(|m| m.image.is_none()));

    let got = c
        .get_image(pb::GetImageRequest {
            image: env.image_ref(),
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(got.digest, image.digest);
    assert_eq!(got.size_bytes, image.size_bytes);
    let listed = c
        .list_images(pb::ListImagesRequest {})
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(
        listed.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        [env.image_ref().as_str()]
    );

    // A second pull finds everything in place.
    let mut again = c
        .pull_image(pb::PullImageRequest {
            image: env.image_ref(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut statuses = Vec::new();
    while let Some(msg) = again.next().await {
        statuses.push(msg.unwrap().status);
    }
    assert!(statuses.contains(&"exists".to_string()), "{statuses:?}");
    assert!(!statuses.contains(&"unpacking".to_string()), "{statuses:?}");

    c.delete_image(pb::DeleteImageRequest {
        image: env.image_ref(),
    })
    .await
    .unwrap();
    let err = c
        .get_image(pb::GetImageRequest {
            image: env.image_ref(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .delete_image(pb::DeleteImageRequest {
            image: env.image_ref(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // containerd's GC freed the blobs and snapshots of the deleted image.
    let leaks = env
        .containerd
        .ctr_ok(&env.namespace, &["content", "ls", "-q"]);
    assert!(
        leaks.trim().is_empty(),
        "content left after delete: {leaks}"
    );
    let snaps = env.containerd.ctr_ok(&env.namespace, &["snapshots", "ls"]);
    assert_eq!(
        snaps.lines().count(),
        1,
        "snapshots left after delete: {snaps}"
    );
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_and_malformed_images_are_reported() {
    let env = TestEnv::new().await;
    let mut c = ImageServiceClient::new(env.channel().await);
    let missing = format!("{}/does-not-exist:latest", env.registry.addr());
    let mut stream = c
        .pull_image(pb::PullImageRequest {
            image: missing.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut err = None;
    while let Some(msg) = stream.next().await {
        if let Err(e) = msg {
            err = Some(e);
        }
    }
    let err = err.expect("pulling a missing image fails");
    assert_eq!(err.code(), Code::NotFound, "{err}");
    for bad in ["", "Upper/Case", "a b", "busybox:"] {
        let err = c
            .pull_image(pb::PullImageRequest { image: bad.into() })
            .await
            .map(|_| ())
            .expect_err(bad);
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err}");
        assert!(err.message().contains("image"), "{err}");
    }
    let err = c
        .get_image(pb::GetImageRequest { image: missing })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_layer_fails_the_pull_and_leaves_no_partial_content() {
    let env = TestEnv::new().await;
    let layout = common::build_layout_with(&[("/corrupt-me", b"a layer the registry spoils")]);
    let info = common::LayoutInfo::read(&layout);
    let image = env.push_image(&layout, "spoiled:1");
    // Same size, other bytes: the registry serves it whole, the digest no longer matches.
    let blob = env.registry.blob_path(info.layer_digests.last().unwrap());
    let mut data = std::fs::read(&blob).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    std::fs::write(&blob, data).unwrap();

    let mut c = ImageServiceClient::new(env.channel().await);
    let mut err = None;
    match c.pull_image(pb::PullImageRequest { image }).await {
        Ok(stream) => {
            let mut stream = stream.into_inner();
            while let Some(msg) = stream.next().await {
                if let Err(e) = msg {
                    err = Some(e);
                }
            }
        }
        Err(e) => err = Some(e),
    }
    let err = err.expect("a layer that does not match its digest fails the pull");
    assert_ne!(err.code(), Code::Internal, "{err}");
    // No partial blob stays in containerd's ingest area (leak_check lists unfinished writes).
    env.leak_check().await;
}
