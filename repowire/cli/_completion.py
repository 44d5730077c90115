"""Shell completion scripts (bash, zsh, fish), made from the command line's own parser."""

from __future__ import annotations

import argparse


def command_tree(
    parser: argparse.ArgumentParser,
) -> dict[tuple[str, ...], tuple[list[str], list[str]]]:
    """Every command path of ``parser`` (``()`` for the top, ``("relay", "keys")``, ...) with
    its subcommands and its option strings, in the parser's order."""
    tree: dict[tuple[str, ...], tuple[list[str], list[str]]] = {}

    def walk(node: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        commands: list[str] = []
        options: list[str] = []
        for action in node._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    commands.append(name)
                    walk(child, (*path, name))
            else:
                options.extend(action.option_strings)
        tree[path] = (commands, options)

    walk(parser, ())
    return tree


def _help_of(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> str:
    """The one-line help of the subcommand at ``path``."""
    node = parser
    help_text = ""
    for name in path:
        for action in node._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if choice.dest == name:
                        help_text = choice.help or ""
                node = action.choices[name]
                break
    return help_text


def completion_script(shell: str, parser: argparse.ArgumentParser) -> str:
    """A completion script for ``shell`` (bash, zsh or fish) made from ``parser``."""
    tree = command_tree(parser)
    if shell == "fish":
        return _fish_script(parser, tree)
    body = _bash_function(tree)
    if shell == "zsh":
        return (
            '# repowire completion for zsh: eval "$(repowire completion zsh)"\n'
            "autoload -U +X bashcompinit && bashcompinit\n" + body
        )
    return '# repowire completion for bash: eval "$(repowire completion bash)"\n' + body


def _fish_script(
    parser: argparse.ArgumentParser, tree: dict[tuple[str, ...], tuple[list[str], list[str]]]
) -> str:
    lines = ["# repowire completion for fish: repowire completion fish | source", ""]
    lines.append("complete -c repowire -f")
    for path, (commands, options) in tree.items():
        if path:
            condition = f"__fish_seen_subcommand_from {path[-1]}"
            if len(path) > 1:
                condition = f"__fish_seen_subcommand_from {path[-2]}; and {condition}"
            if commands:
                condition += f"; and not __fish_seen_subcommand_from {' '.join(commands)}"
        else:
            condition = "__fish_use_subcommand"
        for command in commands:
            description = _help_of(parser, (*path, command)).replace("'", "")
            lines.append(f"complete -c repowire -n '{condition}' -a {command} -d '{description}'")
        for option in options:
            flag = f"-l {option[2:]}" if option.startswith("--") else f"-s {option[1:]}"
            lines.append(f"complete -c repowire -n '{condition}' {flag}")
    return "\n".join(lines) + "\n"


def _bash_function(tree: dict[tuple[str, ...], tuple[list[str], list[str]]]) -> str:
    """The completion function bash runs (zsh too, through bashcompinit)."""
    cases = []
    for path, (commands, options) in tree.items():
        words = " ".join([*commands, *options])
        cases.append(f'        "{" ".join(path)}") words="{words}" ;;')
    known = " ".join(f'"{" ".join(path)}"' for path in tree if path)
    return f"""\
_repowire() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" path="" word next i words=""
    local -a known=({known})
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        [[ "$word" == -* ]] && continue
        next="${{path:+$path }}$word"
        local k
        for k in "${{known[@]}}"; do
            [[ "$k" == "$next" ]] && path="$next" && break
        done
    done
    case "$path" in
{chr(10).join(cases)}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F _repowire repowire
"""
