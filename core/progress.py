"""A progress line for long loops that are not training (training/loop.py has its own):
items done, rate and ETA, at most every 10 seconds, and a total at the end."""
import time

LOG_EVERY_S = 10.0


def reporter(verb: str, noun: str, total=None, log=print):
  """(update(count), finish()): `update` adds `count` items done and logs "VERB DONE[/TOTAL]
  NOUN, RATE NOUN/s[, ETA S s]" when LOG_EVERY_S seconds passed since the last line; `finish`
  logs "VERB DONE NOUN in S s"."""
  clock = {"start": time.time(), "last": time.time(), "done": 0}

  def update(count):
    clock["done"] += count
    now = time.time()
    if now - clock["last"] > LOG_EVERY_S:
      clock["last"] = now
      done, rate = clock["done"], clock["done"] / (now - clock["start"])
      eta = f", ETA {(total - done) / rate:.0f} s" if total else ""
      log(f"{verb} {done}{f'/{total}' if total else ''} {noun}, {rate:.1f} {noun}/s{eta}")

  def finish():
    log(f"{verb} {clock['done']} {noun} in {time.time() - clock['start']:.1f} s")

  return update, finish
