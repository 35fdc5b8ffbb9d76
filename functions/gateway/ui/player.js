// The job detail's player: a progressive `hls` job plays while it runs.
//
// The job view names `playback_url` as soon as the first segment of the fast rung exists.
// The page plays the gateway's growing stream (`/v1/jobs/<id>/play/master.m3u8`, an EVENT
// playlist that hls.js reloads until it ends) with hls.js (vendor/hls.light.min.js, served
// by the gateway: no CDN), or natively where the browser plays HLS itself. Every request
// carries the API key as a header (`xhrSetup`), never in the URL. Once the job has
// succeeded its parts are cleaned up: a player that still needs a segment then moves to
// the packaged VOD (the job view's new `playback_url`) at the same position.

import { authorization } from "./api.js";

const HLS_TYPE = "application/vnd.apple.mpegurl";

// The gateway path of a playback URL: its host is the gateway's configured base URL,
// which may not be how this browser reaches it.
function localPath(url) {
  const parsed = new URL(url, location.href);
  return parsed.pathname + parsed.search;
}

export function createPlayer(box, video, note) {
  let jobId = null;
  let hls = null;
  let source = null; // the path being played
  let job = null;

  function destroy() {
    if (hls) hls.destroy();
    hls = null;
    source = null;
    video.removeAttribute("src");
    video.load();
  }

  function load(path, startAt = 0) {
    if (hls) hls.destroy();
    hls = null;
    source = path;
    const Hls = window.Hls;
    if (Hls && Hls.isSupported()) {
      hls = new Hls({
        enableWorker: false, // the page's policy allows scripts from the gateway only
        startPosition: startAt,
        xhrSetup: (xhr) => {
          const value = authorization();
          if (value) xhr.setRequestHeader("Authorization", value);
        },
      });
      hls.on(Hls.Events.ERROR, (_event, data) => {
        if (!data.fatal) return;
        // The growing stream's parts are gone once the job succeeded: go on from the VOD.
        if (job && job.status === "succeeded" && job.playback_url && localPath(job.playback_url) !== source) {
          load(localPath(job.playback_url), video.currentTime);
        } else {
          note.textContent = `Playback stopped: ${data.details}`;
        }
      });
      hls.loadSource(path);
      hls.attachMedia(video);
    } else if (video.canPlayType(HLS_TYPE) && !authorization()) {
      video.src = path; // native HLS (Safari); it cannot send a key
    } else {
      note.textContent = "This browser cannot play HLS here; open the playlist in an HLS player.";
      return;
    }
    video.play().catch(() => {}); // muted autoplay; a person can press play
  }

  return {
    // Called with every fresh job view of the open job.
    update(view) {
      if (view.job_id !== jobId) {
        destroy();
        jobId = view.job_id;
      }
      job = view;
      box.hidden = !view.playback_url;
      box.dataset.status = view.status;
      if (!view.playback_url) return;
      note.textContent = view.status === "succeeded"
        ? "Playing the packaged stream."
        : `Playable since ${new Date(view.playable_at * 1000).toLocaleTimeString()}: the stream grows as parts are encoded.`;
      if (!source) load(localPath(view.playback_url));
    },
    close() {
      destroy();
      jobId = null;
      job = null;
      box.hidden = true;
    },
  };
}
