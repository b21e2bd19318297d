"""Benchmark-only `--external_plugins` file for scripts/bench_rss.py: `--callbacks rss_report` writes this process's
peak resident set size (the OS high-water mark, getrusage RUSAGE_SELF) when training ends, one file per rank:
$BENCH_RSS_DIR/rank{RANK}.json."""

import json
import os
import resource

from swift.callbacks import TrainerCallback, callbacks_map


class RSSReport(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        rank = os.environ.get('RANK', '0')
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with open(os.path.join(os.environ['BENCH_RSS_DIR'], f'rank{rank}.json'), 'w') as f:
            json.dump({'rank': int(rank), 'peak_rss_kib': peak_kib}, f)


callbacks_map['rss_report'] = RSSReport
