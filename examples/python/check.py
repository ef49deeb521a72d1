"""Drives tessera_client against a running broker; the integration tests run it.

    python check.py fetch BINDING            prints each field as name=value
    python check.py watch COUNT BINDING...   prints one line per yielded set
    python check.py denied BINDING           exits 0 if the broker denies it
"""

import sys

from tessera_client import Client, Denied


def show(creds):
    parts = []
    for binding, credential in sorted(creds.items()):
        fields = ",".join(f"{k}={v.decode()}" for k, v in sorted(credential.fields.items()))
        parts.append(f"{binding}[{credential.version}]:{fields}")
    print(" ".join(parts), flush=True)


def main(argv):
    client = Client.from_env()
    if argv[0] == "fetch":
        show(client.fetch(argv[1:]))
    elif argv[0] == "watch":
        count = int(argv[1])
        for i, creds in enumerate(client.watch(argv[2:])):
            show(creds)
            if i + 1 == count:
                break
    elif argv[0] == "denied":
        try:
            client.fetch(argv[1:])
        except Denied as err:
            print(f"denied: {err.message}", flush=True)
            return 0
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
