; HiveMind Worker installer (NSIS 3, Modern UI 2).
;
; Per-user: installs the one-folder app (hivemind-worker.exe and _internal\, which starts
; without unpacking anything) into %LOCALAPPDATA%\Programs\HiveMind Worker without
; elevation and registers its uninstaller under HKCU, where Apps & Features finds it.
; Running a newer installer over an old one upgrades in place; an older one over a newer
; one asks first (refuses under /S unless /ALLOWDOWNGRADE is given). Settings and data live
; elsewhere (%LOCALAPPDATA%\HiveMind\hivemind-worker); neither install nor uninstall touches them.
;
; Exit codes (installer and uninstaller), also for /S; the reason is appended to
; %TEMP%\hivemind-worker-setup.log:
;   0 done   1 cancelled by the person   2 aborted (NSIS: e.g. a file could not be written)
;   3 HiveMind Worker is running: quit it from its tray icon, then run this again
;   4 a newer version is installed: run with /ALLOWDOWNGRADE to replace it
;
; makensis -DVERSION=1.2.3 -DAPPDIR=dist\hivemind-worker-onedir -DICON=file.ico
;          -DWIZARD_BITMAP=build\nsis\wizard.bmp -DHEADER_BITMAP=build\nsis\header.bmp
;          -DOUTFILE=dist\hivemind-worker-1.2.3-setup.exe installer\windows\hivemind-worker.nsi
; (`python3 build.py nsis` passes all of them and draws the two bitmaps from the icon.)

Unicode true
; The release is a 32-bit installer (NSIS's default; it runs on every Windows). The e2e tier
; compiles the same script for amd64 (-DTARGET=amd64-unicode) to run it under a 64-bit-only
; Wine.
!ifdef TARGET
  Target ${TARGET}
!endif
ManifestDPIAware true
SetCompressor /SOLID lzma

!ifndef VERSION
  !error "pass the version: makensis -DVERSION=x.y.z"
!endif
!ifndef APPDIR
  !define APPDIR "..\..\dist\hivemind-worker-onedir"
!endif
!ifndef ICON
  !define ICON "..\..\file.ico"
!endif
!ifndef WIZARD_BITMAP
  !error "pass the welcome/finish sidebar (164x314 BMP): makensis -DWIZARD_BITMAP=..."
!endif
!ifndef HEADER_BITMAP
  !error "pass the page header image (150x57 BMP): makensis -DHEADER_BITMAP=..."
!endif
!ifndef OUTFILE
  !define OUTFILE "..\..\dist\hivemind-worker-${VERSION}-setup.exe"
!endif

!define APPNAME "HiveMind Worker"
!define EXENAME "hivemind-worker.exe"
!define PUBLISHER "HiveMind"
!define URL "https://github.com/hivemind/hivemind-worker"
!define UNINSTKEY "Software\Microsoft\Windows\CurrentVersion\Uninstall\HiveMindWorker"
!define RUNKEY "Software\Microsoft\Windows\CurrentVersion\Run"
; The value name the app's own "Start at login" setting uses (gui/autostart.py), so the
; installer's choice and the setting stay one switch.
!define RUNVALUE "HiveMind Worker"
!define EXIT_RUNNING 3
!define EXIT_DOWNGRADE 4
!define FAILLOG "$TEMP\hivemind-worker-setup.log"

Name "${APPNAME}"
OutFile "${OUTFILE}"
; No UAC prompt: everything goes under the person's own profile and HKCU.
RequestExecutionLevel user
InstallDir "$LOCALAPPDATA\Programs\${APPNAME}"
; An earlier install's folder wins, so an upgrade lands on top of it.
InstallDirRegKey HKCU "${UNINSTKEY}" "InstallLocation"
BrandingText "${APPNAME} ${VERSION}"

; Explorer's Details tab for the installer itself. VIProductVersion needs four numbers.
!searchreplace VERSION_DOTTED "${VERSION}" "-" "."
VIProductVersion "${VERSION_DOTTED}.0"
VIAddVersionKey "ProductName" "${APPNAME}"
VIAddVersionKey "CompanyName" "${PUBLISHER}"
VIAddVersionKey "FileDescription" "${APPNAME} installer"
VIAddVersionKey "FileVersion" "${VERSION}"
VIAddVersionKey "ProductVersion" "${VERSION}"
VIAddVersionKey "LegalCopyright" "MIT License"

!include "MUI2.nsh"
!include "LogicLib.nsh"
!include "FileFunc.nsh"
!include "WordFunc.nsh"

!define MUI_ICON "${ICON}"
!define MUI_UNICON "${ICON}"
; The product's own artwork instead of NSIS's stock images: the sidebar of the welcome and
; finish pages, and the header of the pages between.
!define MUI_WELCOMEFINISHPAGE_BITMAP "${WIZARD_BITMAP}"
!define MUI_UNWELCOMEFINISHPAGE_BITMAP "${WIZARD_BITMAP}"
!define MUI_HEADERIMAGE
!define MUI_HEADERIMAGE_RIGHT
!define MUI_HEADERIMAGE_BITMAP "${HEADER_BITMAP}"
!define MUI_HEADERIMAGE_UNBITMAP "${HEADER_BITMAP}"
!define MUI_ABORTWARNING
!define MUI_COMPONENTSPAGE_SMALLDESC
!define MUI_FINISHPAGE_RUN "$INSTDIR\${EXENAME}"
!define MUI_FINISHPAGE_RUN_TEXT "Start ${APPNAME} now"

!insertmacro MUI_PAGE_WELCOME
!insertmacro MUI_PAGE_COMPONENTS
!insertmacro MUI_PAGE_DIRECTORY
!insertmacro MUI_PAGE_INSTFILES
!insertmacro MUI_PAGE_FINISH

!insertmacro MUI_UNPAGE_CONFIRM
!insertmacro MUI_UNPAGE_INSTFILES
!insertmacro MUI_UNPAGE_FINISH

!insertmacro MUI_LANGUAGE "English"

; ---------------------------------------------------------------------------- failing

; Stop with an exit code and the reason, after the person was asked (MessageBox) if anyone
; is watching: the reason goes to the details list and to FAILLOG, because /S shows nothing.
; Abort in .onInit quits before any page; in a section it ends the installation there.
!macro FAIL CODE MESSAGE
  SetErrorLevel ${CODE}
  DetailPrint "${MESSAGE}"
  Push "${MESSAGE}"
  Call ${__FAIL_PREFIX}LogFailure
  Abort "${MESSAGE}"
!macroend

!macro LOG_FAILURE_FUNCTION PREFIX
  Function ${PREFIX}LogFailure
    Exch $0
    Push $1
    FileOpen $1 "${FAILLOG}" a
    ${IfNot} ${Errors}
      FileSeek $1 0 END
      FileWrite $1 "$EXEFILE: $0$\r$\n"
      FileClose $1
    ${EndIf}
    Pop $1
    Pop $0
  FunctionEnd
!macroend
!insertmacro LOG_FAILURE_FUNCTION ""
!insertmacro LOG_FAILURE_FUNCTION "un."

; The app is running if its exe cannot be deleted (Windows locks a running program's image).
; Deleting it is the first change either direction makes, so a refusal leaves all in place.
!macro REMOVE_EXE_OR_FAIL
  retry_delete:
  ClearErrors
  Delete "$INSTDIR\${EXENAME}"
  ${If} ${Errors}
  ${OrIf} ${FileExists} "$INSTDIR\${EXENAME}"
    MessageBox MB_RETRYCANCEL|MB_ICONEXCLAMATION \
      "${APPNAME} is running. Quit it from its tray icon, then press Retry." \
      /SD IDCANCEL IDRETRY retry_delete
    !insertmacro FAIL ${EXIT_RUNNING} \
      "${APPNAME} is running: quit it from its tray icon, then run this again."
  ${EndIf}
!macroend

; ---------------------------------------------------------------------------- install

Section "${APPNAME}" SecApp
  SectionIn RO
  SetOutPath "$INSTDIR"

  ; A running worker keeps its exe locked; ask the person to quit it rather than kill it
  ; mid-task (its tasks would only come back after their leases expire).
  ${If} ${FileExists} "$INSTDIR\${EXENAME}"
    !define __FAIL_PREFIX ""
    !insertmacro REMOVE_EXE_OR_FAIL
    !undef __FAIL_PREFIX
  ${EndIf}
  ; The previous version's libraries go whole: a mix of two versions would not start.
  RMDir /r "$INSTDIR\_internal"

  File /r "${APPDIR}\*"
  WriteUninstaller "$INSTDIR\uninstall.exe"

  ; Apps & Features (HKCU: this person's apps).
  WriteRegStr HKCU "${UNINSTKEY}" "DisplayName" "${APPNAME}"
  WriteRegStr HKCU "${UNINSTKEY}" "DisplayVersion" "${VERSION}"
  WriteRegStr HKCU "${UNINSTKEY}" "Publisher" "${PUBLISHER}"
  WriteRegStr HKCU "${UNINSTKEY}" "DisplayIcon" "$INSTDIR\${EXENAME},0"
  WriteRegStr HKCU "${UNINSTKEY}" "InstallLocation" "$INSTDIR"
  WriteRegStr HKCU "${UNINSTKEY}" "URLInfoAbout" "${URL}"
  ; `_?=` runs the uninstaller in place, so whoever started it gets its exit code (without
  ; it, NSIS starts a copy from %TEMP% and exits 0 at once); un.onUninstSuccess then
  ; removes uninstall.exe once it has exited.
  WriteRegStr HKCU "${UNINSTKEY}" "UninstallString" '"$INSTDIR\uninstall.exe" _?=$INSTDIR'
  WriteRegStr HKCU "${UNINSTKEY}" "QuietUninstallString" \
    '"$INSTDIR\uninstall.exe" /S _?=$INSTDIR'
  WriteRegDWORD HKCU "${UNINSTKEY}" "NoModify" 1
  WriteRegDWORD HKCU "${UNINSTKEY}" "NoRepair" 1
  ${GetSize} "$INSTDIR" "/S=0K" $0 $1 $2
  IntFmt $0 "0x%08X" $0
  WriteRegDWORD HKCU "${UNINSTKEY}" "EstimatedSize" "$0"
SectionEnd

Section "Start menu shortcut" SecStartMenu
  SectionIn RO
  CreateShortCut "$SMPROGRAMS\${APPNAME}.lnk" "$INSTDIR\${EXENAME}" "" "$INSTDIR\${EXENAME}" 0
SectionEnd

Section /o "Desktop shortcut" SecDesktop
  CreateShortCut "$DESKTOP\${APPNAME}.lnk" "$INSTDIR\${EXENAME}" "" "$INSTDIR\${EXENAME}" 0
SectionEnd

Section /o "Start ${APPNAME} when I log in" SecAutostart
  WriteRegStr HKCU "${RUNKEY}" "${RUNVALUE}" '"$INSTDIR\${EXENAME}" gui --hidden'
SectionEnd

!insertmacro MUI_FUNCTION_DESCRIPTION_BEGIN
  !insertmacro MUI_DESCRIPTION_TEXT ${SecApp} "The worker: the tray app and every command."
  !insertmacro MUI_DESCRIPTION_TEXT ${SecStartMenu} "A shortcut in the Start menu."
  !insertmacro MUI_DESCRIPTION_TEXT ${SecDesktop} "A shortcut on the desktop."
  !insertmacro MUI_DESCRIPTION_TEXT ${SecAutostart} \
    "Start in the tray when you log in. You can change this later in Settings."
!insertmacro MUI_FUNCTION_DESCRIPTION_END

Function .onInit
  ; An older installer over a newer install: ask, or under /S refuse unless told to.
  ReadRegStr $0 HKCU "${UNINSTKEY}" "DisplayVersion"
  ${If} $0 != ""
    ${VersionCompare} "$0" "${VERSION}" $1  ; 1: the installed one is newer
    ${If} $1 == 1
      ${GetParameters} $2
      ClearErrors
      ${GetOptions} $2 "/ALLOWDOWNGRADE" $3
      ${If} ${Errors}
        ${IfNot} ${Silent}
          MessageBox MB_YESNO|MB_ICONQUESTION|MB_DEFBUTTON2 \
            "${APPNAME} $0 is installed, which is newer than this installer's ${VERSION}.$\r$\n$\r$\nReplace it with ${VERSION}?" \
            IDYES downgrade_ok
        ${EndIf}
        !define __FAIL_PREFIX ""
        !insertmacro FAIL ${EXIT_DOWNGRADE} \
          "${APPNAME} $0 is installed, newer than ${VERSION}: run this installer with /ALLOWDOWNGRADE to replace it."
        !undef __FAIL_PREFIX
        downgrade_ok:
      ${EndIf}
    ${EndIf}
  ${EndIf}

  ; On an upgrade, keep the start-at-login choice the person made (in the installer or
  ; in the app's settings) as the default.
  ClearErrors
  ReadRegStr $0 HKCU "${RUNKEY}" "${RUNVALUE}"
  ${IfNot} ${Errors}
    SectionSetFlags ${SecAutostart} ${SF_SELECTED}
  ${EndIf}
  ${If} ${FileExists} "$DESKTOP\${APPNAME}.lnk"
    SectionSetFlags ${SecDesktop} ${SF_SELECTED}
  ${EndIf}
FunctionEnd

; ---------------------------------------------------------------------------- uninstall

Section "Uninstall"
  !define __FAIL_PREFIX "un."
  !insertmacro REMOVE_EXE_OR_FAIL
  !undef __FAIL_PREFIX
  ; Only what the installer put here: the folder may hold things of the person's.
  RMDir /r "$INSTDIR\_internal"
  Delete "$INSTDIR\uninstall.exe"  ; fails while it runs in place (_?=): see below
  RMDir "$INSTDIR"
  Delete "$SMPROGRAMS\${APPNAME}.lnk"
  Delete "$DESKTOP\${APPNAME}.lnk"
  DeleteRegValue HKCU "${RUNKEY}" "${RUNVALUE}"
  DeleteRegKey HKCU "${UNINSTKEY}"
  ; Settings, the login token (Credential Manager) and data in %LOCALAPPDATA%\HiveMind
  ; stay: reinstalling picks up where the person left off.
SectionEnd

; Run in place (`_?=`, as the registered commands do, so that the caller gets the exit
; code), the uninstaller cannot delete itself. A copy of it in %TEMP% does that once it has
; exited, and removes the then empty folder; the copy stays in %TEMP%, as NSIS's own does.
Function un.onUninstSuccess
  ${If} ${FileExists} "$INSTDIR\uninstall.exe"
    CopyFiles /SILENT "$INSTDIR\uninstall.exe" "$TEMP\hivemind-worker-cleanup.exe"
    Exec '"$TEMP\hivemind-worker-cleanup.exe" /S /CLEANUP _?=$INSTDIR'
  ${EndIf}
FunctionEnd

Function un.onInit
  ${GetParameters} $0
  ClearErrors
  ${GetOptions} $0 "/CLEANUP" $1
  ${IfNot} ${Errors}
    ; Wait (up to 30 s) for the uninstaller that started this copy to exit.
    ${For} $2 1 60
      Delete "$INSTDIR\uninstall.exe"
      ${IfNot} ${FileExists} "$INSTDIR\uninstall.exe"
        ${ExitFor}
      ${EndIf}
      Sleep 500
    ${Next}
    RMDir "$INSTDIR"
    Quit
  ${EndIf}
FunctionEnd
