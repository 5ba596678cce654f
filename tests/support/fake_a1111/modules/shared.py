class State:
    interrupted = False
    skipped = False


state = State()
